/// `POST /api/v1/bids/`: a user reserves an offered instance, or a slot for
/// a flavor on an appliance. Exactly one of `instance` and
/// `appliance` + `flavor`; at most one of `wisp` and `callback_url`.
public struct ReservationRequest: Codable, Sendable, Equatable {
    /// An instance on offer (state 1).
    public var instance: String?
    /// The appliance to build a new instance on...
    public var appliance: String?
    /// ...with this flavor.
    public var flavor: String?
    /// The wisp to boot from (the user's own); nil: the user's default.
    public var wisp: String?
    /// Where the pool fetches the start parameters instead.
    public var callbackURL: String?
    /// How long the instance is leased for once it starts (nil: no end).
    public var leaseSeconds: Int?

    enum CodingKeys: String, CodingKey {
        case instance, appliance, flavor, wisp
        case callbackURL = "callback_url"
        case leaseSeconds = "lease_seconds"
    }

    public init(
        instance: String? = nil, appliance: String? = nil, flavor: String? = nil, wisp: String? = nil,
        callbackURL: String? = nil, leaseSeconds: Int? = nil
    ) {
        self.instance = instance
        self.appliance = appliance
        self.flavor = flavor
        self.wisp = wisp
        self.callbackURL = callbackURL
        self.leaseSeconds = leaseSeconds
    }
}

/// A reservation ("bid"): it becomes the instance's owner and wisp when the
/// appliance next reports the instance, and lapses unclaimed at `expires`.
public struct Reservation: Codable, Sendable, Equatable {
    public var id: String
    /// The user who holds it.
    public var user: String
    /// The reserved instance (for a flavor slot: the name the pool gave the
    /// new instance).
    public var instance: String
    public var appliance: String
    public var flavor: String?
    public var wisp: String?
    public var callbackURL: String?
    /// When it lapses unclaimed, in Unix seconds.
    public var expires: Int

    enum CodingKeys: String, CodingKey {
        case id, user, instance, appliance, flavor, wisp, expires
        case callbackURL = "callback_url"
    }

    public init(
        id: String, user: String, instance: String, appliance: String, flavor: String? = nil, wisp: String? = nil,
        callbackURL: String? = nil, expires: Int
    ) {
        self.id = id
        self.user = user
        self.instance = instance
        self.appliance = appliance
        self.flavor = flavor
        self.wisp = wisp
        self.callbackURL = callbackURL
        self.expires = expires
    }
}

/// One change of an instance's state, as `GET /api/v1/events` streams it.
public struct InstanceEvent: Codable, Sendable, Equatable {
    public var name: String
    public var state: InstanceState
    public var appliance: String
    public var owner: String

    public init(name: String, state: InstanceState, appliance: String, owner: String) {
        self.name = name
        self.state = state
        self.appliance = appliance
        self.owner = owner
    }
}
