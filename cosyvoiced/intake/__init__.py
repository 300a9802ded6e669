"""Intake channels: each turns what clients send into `Job`s for the supervisor."""
