-- The forecast's snapshot reads each waiting task's LoRA set (a worker groups its work by model and set, and the
-- forecast replays that): the set joins the claim-order index's payload, so the read stays an index-only scan.
DROP INDEX tasks_queue;
CREATE INDEX tasks_queue ON tasks (status, priority DESC, fair_tag, fair_start DESC, seq)
    INCLUDE (model, width, height, steps, count, created_at, loras);
