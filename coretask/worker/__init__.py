"""The worker side: manager (processes), process (fetch loop + pool), control (pub/sub),
runner (one task, abortable), maintenance (timers)."""
