-- A claim takes the front of its model's queue in claim order, and the API's queue snapshot corrects for that by
-- itself (every task before the first one still waiting is gone). So a claim no longer moves the change counter:
-- only a cancel, a delete, failing a model's waiting tasks or a requeue does, and the snapshot is rebuilt for
-- those alone. With a worker running, each claim used to cost every server process a rebuild of the whole queue.
DROP TRIGGER tasks_leave_queue;
CREATE TRIGGER tasks_leave_queue AFTER UPDATE OF status ON tasks
WHEN (OLD.status = 'waiting') != (NEW.status = 'waiting') AND NOT (OLD.status = 'waiting' AND NEW.status = 'processing')
BEGIN
    UPDATE queue_state SET changes = changes + 1 WHERE id = 1;
END;
