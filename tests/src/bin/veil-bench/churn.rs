pub(crate) fn churn(_quick: bool) {}
