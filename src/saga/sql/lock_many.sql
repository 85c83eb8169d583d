select saga_id, fence, cancel_requested, answered_pending, state, step, attempt
           from sagas where saga_id = any($1) order by saga_id for update