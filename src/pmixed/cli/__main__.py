from pmixed.cli import main

main()
