"""A training run: the Trainer (`trainer`), its metrics and FLOPs (`metrics`, `flops`), resume and preemption
(`resilience`), the run directory (`rundir`), several processes (`ranks`)."""
