"""``python -m clipmask``: the same as the ``clipmask`` command."""
from clipmask._cli import main

if __name__ == "__main__":
    main()
