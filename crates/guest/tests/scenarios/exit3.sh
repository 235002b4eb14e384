# No #! line on purpose: the guest runs such a scenario with bash.
echo about to exit with status 3
exit 3
