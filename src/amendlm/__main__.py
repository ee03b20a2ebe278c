"""``python -m amendlm ...`` runs the command line (same as the ``amendlm`` script)."""

from amendlm.cli import main

if __name__ == "__main__":
    main()
