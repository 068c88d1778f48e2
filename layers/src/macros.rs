/// Adds `get_ref`, `get_mut` and `into_inner` to a middleware whose wrapped
/// service (of type `S`, or the type named) lives in a field called `inner`.
macro_rules! inner_accessors {
    () => {
        inner_accessors!(S);
    };
    ($inner:ident) => {
        /// Returns a reference to the inner service.
        pub fn get_ref(&self) -> &$inner {
            &self.inner
        }

        /// Returns a mutable reference to the inner service.
        pub fn get_mut(&mut self) -> &mut $inner {
            &mut self.inner
        }

        /// Consumes `self`, returning the inner service.
        pub fn into_inner(self) -> $inner {
            self.inner
        }
    };
}
