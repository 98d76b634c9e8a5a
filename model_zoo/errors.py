"""The one exception type for mistakes in what the user asked for."""


class UserError(Exception):
  """Bad input: a config value, a data set, a work directory.

  Entry points print the message as one line and exit with status 1; the
  message says what is wrong and what to do about it.
  """
