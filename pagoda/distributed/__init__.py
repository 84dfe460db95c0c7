"""Distributed layer (beside worker): how the engine process and its worker processes talk on one machine.

`shm_broadcast` holds the shared-memory `MessageQueue` that carries one
writer's messages (the scheduler's output, control calls) to N readers.
`parallel_state` holds a worker's tensor-parallel process group (gloo on
CPU, NCCL on CUDA) and the collectives the parallel model layers call.
"""
