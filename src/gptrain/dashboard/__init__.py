"""The web dashboard (the `dashboard` extra): it reads run directories and never imports the trainer."""
