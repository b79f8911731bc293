"""The optimizer (a shard-aware Adafactor, or torch's AdamW), its layout of FSDP shards, and the schedule."""
