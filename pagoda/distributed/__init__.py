"""Distributed layer (beside worker): how the engine process and its worker processes talk on one machine.

`shm_broadcast` holds the shared-memory `MessageQueue` that carries one
writer's messages (the scheduler's output, control calls) to N readers.
"""
