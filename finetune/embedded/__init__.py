"""The embedded models and data: the tiny random model and its tasks (`tiny`), SmolLM2 and its contacts task
(`smollm2`)."""
