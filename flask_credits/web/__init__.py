"""The HTTP layer: the ``credits`` blueprint, ``@requires_credits``, the one module that turns errors
into JSON or HTML responses, body limits, and the ``flask credits`` commands."""
