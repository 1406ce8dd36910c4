/// The one rule for the names of instances and appliances, which become
/// host names, file names on appliances and URL path parts: 1 to 63
/// lowercase ASCII letters, digits and hyphens, starting with a letter or
/// digit (`^[a-z0-9][a-z0-9-]{0,62}$`), and never 32 hexadecimal digits,
/// the form of ids, so that a name can never be taken for another
/// record's id.
public enum ResourceName {
    /// The pattern, as documented.
    public static let pattern = "^[a-z0-9][a-z0-9-]{0,62}$"

    /// Why `name` breaks the rule, or nil when it keeps it.
    public static func problem(_ name: String) -> String? {
        let bytes = Array(name.utf8)
        guard let first = bytes.first, bytes.count <= 63 else { return "must be 1 to 63 characters" }
        func lowerAlphanumeric(_ byte: UInt8) -> Bool { (0x61...0x7A).contains(byte) || (0x30...0x39).contains(byte) }
        guard lowerAlphanumeric(first) else { return "must start with a lowercase letter or a digit" }
        guard bytes.allSatisfy({ lowerAlphanumeric($0) || $0 == 0x2D }) else {
            return "may hold only lowercase letters, digits and '-'"
        }
        if hasIDForm(name) { return "must not be 32 hexadecimal digits, the form of ids" }
        return nil
    }

    /// Whether `text` has the form of an id: 32 lowercase hexadecimal digits.
    public static func hasIDForm(_ text: String) -> Bool {
        text.utf8.count == 32 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    /// Whether `name` keeps the rule.
    public static func isValid(_ name: String) -> Bool { problem(name) == nil }
}

/// A guest login user's name: what `useradd` accepts by default (a
/// lowercase letter or `_`, then up to 31 lowercase letters, digits, `_` or
/// `-`).
public enum LoginUserName {
    public static func isValid(_ user: String) -> Bool {
        let lower = "abcdefghijklmnopqrstuvwxyz_"
        guard let first = user.first, lower.contains(first), user.count <= 32 else { return false }
        return user.allSatisfy { lower.contains($0) || "0123456789-".contains($0) }
    }
}
