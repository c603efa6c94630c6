"""The stream worker: Kafka in, online state and raw Iceberg tables out; window kernels; the demo producer."""
