"""The thin padless trainer: memory-mapped shards in, one varlen token stream per micro-batch, fused kernels."""
