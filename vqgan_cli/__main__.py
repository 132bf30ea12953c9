from vqgan_cli.cli import main

main()
