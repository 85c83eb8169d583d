//! `ostore-tools verify`: the invariants of a drained system ([`ostore_orders::verify`]), checked
//! from the command line; the fault-injection suite (`scripts/chaos`) runs it with `--json`.

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Args;
use ostore_orders::config::DatabaseArgs;
use ostore_orders::verify::{self, Options, Report, Simulators, TopicRecord};

/// `verify` options.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The Product Catalog simulator (with --shipments-url: checks 2, 3 and 5 compare the service
    /// with the simulators; without, they are not run).
    #[arg(long, env = "CATALOG_URL", requires = "shipments_url")]
    pub catalog_url: Option<String>,
    /// The Shipment Tracking simulator.
    #[arg(long, env = "SHIPMENTS_URL", requires = "catalog_url")]
    pub shipments_url: Option<String>,
    /// A product's stock before the run, `PRODUCT_ID=QUANTITY` (repeat for each product): check 3
    /// verifies that its available and reserved stock still add up to it.
    #[arg(long = "initial-stock", value_parser = parse_stock)]
    pub initial_stock: Vec<(i32, i64)>,
    /// The broker's records as JSON lines (`topic`, `key`, `value`: the output of `kafka dump`):
    /// check 4 then also finds every published outbox row in its topic (by eventID and key).
    #[arg(long)]
    pub topic_records: Option<std::path::PathBuf>,
    /// The topics' names (their records and outbox rows are read under these names).
    #[command(flatten)]
    pub topics: ostore_orders::topics::Topics,
    /// Print the report as one JSON object (`{"checks": [{id, name, ok, figures}]}`) and exit 0
    /// whatever the verdicts; without it, a table, and exit 1 when a check fails.
    #[arg(long)]
    pub json: bool,
}

fn parse_stock(s: &str) -> Result<(i32, i64), String> {
    let (id, qty) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PRODUCT_ID=QUANTITY"))?;
    let id = id.trim().parse().map_err(|e| format!("product id {id:?}: {e}"))?;
    let qty: i64 = qty.trim().parse().map_err(|e| format!("quantity {qty:?}: {e}"))?;
    if qty < 0 {
        return Err(format!("quantity {qty} is negative"));
    }
    Ok((id, qty))
}

/// Runs the checks and prints the report.
pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let pool = ostore_orders::db::connect(&args.database.database_url, 2).await?;
    let options = Options {
        simulators: args
            .catalog_url
            .zip(args.shipments_url)
            .map(|(catalog_url, shipments_url)| Simulators {
                catalog_url,
                shipments_url,
            }),
        initial_stock: args.initial_stock.into_iter().collect::<BTreeMap<_, _>>(),
        topic_records: match &args.topic_records {
            Some(path) => {
                Some(read_records(path).with_context(|| format!("--topic-records {}", path.display()))?)
            }
            None => None,
        },
        topics: args.topics,
    };
    let report = verify::run(&pool, &options)
        .await
        .context("verify: reading the database and the simulators")?;
    pool.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    print_table(&report);
    let failed = report.failed();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} checks failed",
        failed.len(),
        report.checks.len()
    );
    Ok(())
}

/// Reads `kafka dump`'s JSON lines; a value that is not an envelope has no eventID.
fn read_records(path: &std::path::Path) -> anyhow::Result<Vec<TopicRecord>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            let rec: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
            let topic = rec["topic"]
                .as_str()
                .with_context(|| format!("line {}: no topic", n + 1))?
                .to_string();
            let event_id = rec["value"]
                .as_str()
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                .and_then(|v| v["eventID"].as_str().map(str::to_string));
            Ok(TopicRecord {
                topic,
                event_id,
                key: rec["key"].as_str().map(str::to_string),
            })
        })
        .collect()
}

fn print_table(report: &Report) {
    let w = report.checks.iter().map(|c| c.name.len() + 2).max().unwrap_or(5);
    println!("{:w$}  result  figures", "check");
    println!("{}  ------  {}", "-".repeat(w), "-".repeat(60));
    for c in &report.checks {
        let mut lines = c.figures.lines();
        let name = format!("{} {}", c.id, c.name);
        let verdict = if c.ok { "PASS" } else { "FAIL" };
        println!("{name:w$}  {verdict:6}  {}", lines.next().unwrap_or(""));
        for extra in lines {
            println!("{:w$}          {extra}", "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_records_are_read_from_kafka_dump_lines() {
        let path = std::env::temp_dir().join(format!("ostore-verify-{}.jsonl", std::process::id()));
        std::fs::write(
            &path,
            concat!(
                r#"{"topic":"orders.events","partition":0,"offset":0,"key":"7","headers":{},"value":"{\"eventID\":\"e1\"}"}"#,
                "\n",
                r#"{"topic":"shipments.tracking-events","partition":1,"offset":3,"key":null,"headers":{},"value":"not json"}"#,
                "\n"
            ),
        )
        .unwrap();
        let records = read_records(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            records,
            [
                TopicRecord {
                    topic: "orders.events".into(),
                    event_id: Some("e1".into()),
                    key: Some("7".into()),
                },
                TopicRecord {
                    topic: "shipments.tracking-events".into(),
                    event_id: None,
                    key: None,
                },
            ]
        );
        assert!(read_records(std::path::Path::new("/nonexistent/records.jsonl")).is_err());
    }

    #[test]
    fn initial_stock_is_product_equals_quantity_and_nonsense_is_refused() {
        assert_eq!(parse_stock("3=120"), Ok((3, 120)));
        assert!(parse_stock("3").is_err());
        assert!(parse_stock("x=1").is_err());
        assert!(parse_stock("3=-1").is_err());
    }
}
