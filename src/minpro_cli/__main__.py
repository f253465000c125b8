from minpro_cli.cli import main

main()
