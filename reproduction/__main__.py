"""`python -m xclip.reproduction` = `xclip reproduce` (what `make reproduce` runs)."""
from xclip.reproduction.cli import main

if __name__ == "__main__":
    main()
