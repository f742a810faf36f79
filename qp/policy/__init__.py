"""The policy in force (what operators change and SIGHUP reloads): its values and loader."""
