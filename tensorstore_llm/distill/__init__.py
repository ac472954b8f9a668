"""Teacher-logit datasets: RS-KD / top-k precompute, Arrow shards, reader, losses, alignment."""
