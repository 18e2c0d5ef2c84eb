"""What runs and scores mean: classification metrics, evaluation on any labelled store,
figures and the HTML report."""
