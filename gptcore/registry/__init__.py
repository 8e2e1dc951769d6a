"""The model registry, torch-free: registration, the promotion gates, versions compared side by side,
the scoring stage and its drift monitor."""
