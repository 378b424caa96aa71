"""Built-in tasks; each registers itself with `train.task.register` when imported (`train.task.get_task` imports
them by name)."""
