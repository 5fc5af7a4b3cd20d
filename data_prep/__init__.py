"""data_prep: everything that makes data before training (sources, prompts, the tiny task and models, SFT
warm-up, corpus sampling, scoring, process scores, baseline sets). Imports `dqo_verl`; never imported by it."""
