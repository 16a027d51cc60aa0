"""The ReplaceMe method: choose a cut, fit the linear map, fold it and remove the blocks."""
