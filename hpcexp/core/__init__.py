"""Project model, on-disk layout and run records: what every stage shares."""
