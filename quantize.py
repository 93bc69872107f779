"""python quantize.py --base_model=DIR --method=gptq|awq|exl2|exl3 --out=DIR: see quantchat/quantize.py."""
from quantchat.quantize import cli

if __name__ == "__main__":
    cli()
