"""The padless shard format: packed examples in zstd-compressed, memory-mappable Arrow IPC files."""
