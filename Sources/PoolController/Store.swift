import Foundation
import PoolAPI

/// A user of the pool.
public struct User: Sendable, Equatable, Codable {
    public var name: String
    public var superuser: Bool
    /// How many instances the user may hold at once.
    public var maxInstances: Int
    public var createdAt: Date
}

/// A compute appliance (a libvirt host running the agent).
public struct Appliance: Sendable, Equatable, Codable {
    public var name: String
    /// The owning user's name.
    public var owner: String
    /// A disabled appliance is refused (409) and gets no work.
    public var enabled: Bool
    public var version: String?
    public var latitude: Double?
    public var longitude: Double?
    public var dynamicImages: Bool
    /// When it last authorized or checked in.
    public var lastSeen: Date?
    public var createdAt: Date
}

/// The pool's storage. One implementation per backend (SQLite now); the
/// HTTP routes and the admin commands see only this protocol.
public protocol PoolStore: Sendable {
    /// Creates a user whose token has the given digest.
    func addUser(name: String, superuser: Bool, maxInstances: Int, tokenDigest: String) async throws -> User
    func users() async throws -> [User]

    /// Creates an appliance owned by an existing user.
    func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance
    func appliances() async throws -> [Appliance]
    /// Enables or disables an appliance.
    func setAppliance(_ name: String, enabled: Bool) async throws -> Appliance
    /// Replaces an appliance's token; the old one stops working at once.
    func setApplianceToken(_ name: String, tokenDigest: String) async throws
    /// The appliance whose token has this digest.
    func appliance(tokenDigest: String) async throws -> Appliance?
    /// Records what an appliance said about itself, and that it was seen.
    func recordCheckIn(_ name: String, block: ApplianceBlock, at date: Date) async throws -> Appliance

    func addFlavor(_ flavor: Flavor) async throws
    func flavors() async throws -> [Flavor]
}
