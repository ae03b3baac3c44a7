"""The composition root: the ``edgefl`` command line (cli.py) and the local launcher that starts a
whole fleet on one machine (local.py). The one package allowed to import every role; the roles
(broker/, device/, aggregator/) import only edgefl/, and edgefl/ imports none of them (the
contracts in pyproject.toml, checked by ``make lint``)."""
