"""The batch worker: claims chunks, runs their lines on an engine, saves the results."""
