//! Build script (Cargo.toml's `build`): rebuild the service when a migration is added or changed.
//! `sqlx::migrate!` (src/db.rs) embeds `migrations/` at compile time, but Cargo saw only the
//! files it read, not the folder: a new migration file left the old set embedded until another
//! source changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
