"""SIF -> a running container: Apptainer argument lists and launch plans."""
