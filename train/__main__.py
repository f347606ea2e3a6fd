import sys

print("the trainer is now visualchat_train: python -m visualchat_train ...", file=sys.stderr)

from visualchat_train.cli import main  # noqa: E402 - the notice comes first, before the trainer's imports

sys.exit(main())
