update sagas s
                      set state = u.state, step = u.step, attempt = u.attempt, next_attempt_at = u.next_attempt_at,
                          data = u.data, failure = u.failure, last_error = u.last_error,
                          last_error_class = u.last_error_class,
                          lease_owner = case when u.keep then s.lease_owner end,
                          lease_expires_at = case when u.keep then now() + $14 end,
                          answer = coalesce(s.answer, u.answer), updated_at = now(),
                          finished_at = case when u.finished then now() end, step_name = u.step_name,
                          trace_context = case when u.session is null then s.trace_context
                                               else s.trace_context || u.session end
                     from unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::timestamptz[], $6::jsonb[],
                                 $7::jsonb[], $8::text[], $9::text[], $10::bool[], $11::jsonb[], $12::bool[],
                                 $13::text[], $15::jsonb[])
                          as u(saga_id, state, step, attempt, next_attempt_at, data, failure, last_error,
                               last_error_class, keep, answer, finished, step_name, session)
                    where s.saga_id = u.saga_id