-- A worker grouping its work by variant (a model and its LoRA set) claims the next task of one LoRA set: this
-- index finds it in one lookup. Partial, on waiting tasks only, so it stays small and costs little to keep.
CREATE INDEX tasks_variant_queue ON tasks (model, loras, priority DESC, fair_tag, fair_start DESC, seq)
 WHERE status = 'waiting';
