-- As SQLite's migration 0016: the next waiting task of one model and LoRA set, in one lookup.
CREATE INDEX tasks_variant_queue ON tasks (model, loras, priority DESC, fair_tag, fair_start DESC, seq)
 WHERE status = 'waiting';
