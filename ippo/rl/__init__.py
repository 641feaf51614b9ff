"""The PPO / I-PPO trainer: ``train(cfg)`` in ``loop.py`` reads top to bottom as named phases."""
