"""Which testbed identities train what. Ids below 1,000,000 are never trained on: the demo,
tests and benchmarks draw their identities from there."""
ENCODER_TRAIN_IDS = range(1_000_000, 1_004_000)
GENERATOR_TRAIN_FIRST_ID = 2_000_000  # the generator sees fresh identities from here upward
HELD_OUT_LIMIT = 1_000_000
