"""Training side of KARMA: data sets, frozen content features, (later) the query/item towers and losses."""
