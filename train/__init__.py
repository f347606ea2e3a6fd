"""The trainer was renamed ``visualchat_train`` (a top-level package named ``train`` collides with anything
else of that name). This folder is not installed (pyproject.toml does not list it): it only keeps
``python -m train ...`` working in a checkout, forwarding to ``python -m visualchat_train ...``."""
