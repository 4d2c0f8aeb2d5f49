"""The error for mistakes that are the user's to fix: CLIs print its message alone."""


class UserError(ValueError):
  """A mistake in the config, the data or the workdir, with the fix in its message.

  It subclasses ValueError, so callers that catch ValueError keep working.
  """
