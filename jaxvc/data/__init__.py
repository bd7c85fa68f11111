"""Data: example/record format (records), media decoding (media), `jaxvc pack` (pack), sources (sources: packed
ArrayRecord, TFDS, folders, lists), per-example transforms (transforms), the Grain pipeline with stream mixing,
batch-level switching and restorable state (pipeline), and the synthetic subject world (synthetic)."""
