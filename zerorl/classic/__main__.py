"""`python -m zerorl.classic --algo ppo --env CartPole-v1 ...` (same flags as `zerorl classic`)."""

import sys

from zerorl.classic.cli import main

if __name__ == "__main__":
    sys.exit(main())
