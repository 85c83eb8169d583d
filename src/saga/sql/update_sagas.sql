select saga_update_many($1::uuid[], $2::text[], $3::int[], $4::int[], $5::timestamptz[], $6::jsonb[],
                        $7::jsonb[], $8::text[], $9::text[], $10::bool[], $11::jsonb[], $12::bool[],
                        $13::text[], $14, $15::jsonb[])
