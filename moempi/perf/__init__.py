"""The analytic performance and memory model (docs/plan.md): low in the stack, because
the runtime sizes micro-batches and checks memory with it."""
