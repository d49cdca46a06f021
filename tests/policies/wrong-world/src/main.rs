fn main() { println!("I am not a policy"); }
